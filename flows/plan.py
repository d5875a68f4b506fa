"""The resolve stage: turn a release name into a typed Plan with every input pinned and one content fingerprint.

The fingerprint is the sha256 of every input that changes the released artefact: the release, model and suite
entries of the matrix (not the schedule), the pinned model revision, the chip profile folder, a registry base
image's digest, the artefact templates, the kernel sources, the pinned kernel toolchain and the chip's tool versions. Same inputs, same
fingerprint; later stages use it as the image label and the key of every cache.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from flows.build import split_layers
from flows.errors import FlagReleaseError
from flows.files import sha256_file, tree_hashes, write_model
from flows.matrix import ChipProfile, Model, ReleaseMatrix, Schedule, Suite
from flows.registry import RegistryClient, Repository
from flows.revisions import PinnedRevision, resolve_revision
from flows.settings import Settings

PLAN_SCHEMA_VERSION = 1
ARTEFACT_TEMPLATE_SUFFIXES = (".j2",)
IMAGE_SOURCE_DIRS = ("kernels", "engine")  # copied into every image: our kernels and the engine that calls them
IMAGE_SOURCE_SUFFIXES = (".py", ".yaml", ".json")
IMAGE_EXTRAS = ("kernels", "engine")  # pyproject extras installed into the image
REPORT_TEMPLATES_DIR = "reports"  # templates/reports/ render UI reports only: they do not change the artefact


class BaseWeights(BaseModel):
    """The matrix model a derived model's weights are made from (its revision is the release's pinned one)."""

    model_config = ConfigDict(frozen=True)

    name: str
    model: Model


class Plan(BaseModel):
    """What a release will build, from what, and under which fingerprint. Written as JSON; read back by later stages."""

    model_config = ConfigDict(frozen=True)

    schema_version: int = PLAN_SCHEMA_VERSION
    release: str
    chip: ChipProfile
    model_name: str
    model: Model
    suite_name: str
    suite: Suite
    reference: str
    repository: str
    schedule: Schedule
    revision: PinnedRevision
    inputs: dict[str, str]
    fingerprint: str
    resolved_at: datetime
    base: BaseWeights | None = None  # set for a derived model

    @property
    def short_fingerprint(self) -> str:
        return self.fingerprint[:12]


def resolve(matrix: ReleaseMatrix, release_name: str, settings: Settings) -> Plan:
    release = matrix.release(release_name)
    model = matrix.spec.models[release.model]
    base = derived_from(matrix, model)
    revision = resolve_revision((base.model if base else model).source, offline=settings.offline,
                                timeout_s=settings.hub_timeout_s, pypi_index=settings.pypi_index)
    inputs = {**fingerprint_inputs(matrix, release_name, revision, settings.project_dir),
              **base_image_input(matrix.chips[release.chip], settings)}
    return Plan(
        release=release_name,
        chip=matrix.chips[release.chip],
        model_name=release.model,
        model=model,
        suite_name=release.suite,
        suite=matrix.spec.suites[release.suite],
        reference=release.reference,
        repository=settings.repository_for(release.repository),
        schedule=release.schedule,
        revision=revision,
        inputs=inputs,
        fingerprint=fingerprint(inputs),
        resolved_at=datetime.now(timezone.utc),
        base=base,
    )


def derived_from(matrix: ReleaseMatrix, model: Model) -> BaseWeights | None:
    """A derived model's base: what its weights are made from, pinned through the base's own source."""
    if model.source.hub != "derived":
        return None
    return BaseWeights(name=model.source.repo, model=matrix.spec.models[model.source.repo])


def fingerprint_inputs(matrix: ReleaseMatrix, release_name: str, revision: PinnedRevision, project_dir: Path) -> dict[str, str]:
    """Every artefact-changing input as `name -> value or sha256`, so a changelog can say which one moved."""
    release = matrix.release(release_name)
    chip = matrix.chips[release.chip]
    inputs = {
        "matrix/release": _digest(release.model_dump(mode="json", exclude={"schedule"})),
        "matrix/model": _digest(matrix.spec.models[release.model].model_dump(mode="json")),
        "matrix/suite": _digest(matrix.spec.suites[release.suite].model_dump(mode="json")),
        "model/revision": revision.fingerprint_value,
    }
    base = derived_from(matrix, matrix.spec.models[release.model])
    if base is not None:
        inputs["matrix/base-model"] = _digest(base.model.model_dump(mode="json"))
    for name in (release.model, *([base.name] if base else [])):
        lock = project_dir / "locks" / f"{name}.json"
        if lock.exists():
            inputs[f"lock/{name}.json"] = sha256_file(lock)
    inputs.update(tree_hashes(matrix.chip_dir(release.chip), f"chip/{release.chip}", suffixes=("",)))
    inputs.update(tree_hashes(project_dir / "templates", "template", ARTEFACT_TEMPLATE_SUFFIXES,
                              exclude_dirs=frozenset({REPORT_TEMPLATES_DIR})))
    for folder in IMAGE_SOURCE_DIRS:
        inputs.update(tree_hashes(project_dir / folder, folder.removesuffix("s"), IMAGE_SOURCE_SUFFIXES,
                                  exclude_dirs=frozenset({"__pycache__"})))
    inputs["build/split_layers.py"] = sha256_file(Path(split_layers.__file__))  # it lays out the image's layers
    inputs.update({f"package/{name}": version for name, version in image_requirements(project_dir).items()})
    inputs.update({f"tool/{name}": version for name, version in sorted(chip.versions.items())})
    return inputs


def base_image_input(chip: ChipProfile, settings: Settings) -> dict[str, str]:
    """A registry base image by content: the digest its tag points to now, so a moved vendor tag is a new
    fingerprint (the reference string alone is already in the chip profile). Offline, or when its registry does not
    answer, it is recorded as unresolved, like an unpinned model revision. A base pinned by digest is its digest."""
    if chip.base_image is None:
        return {}
    key, reference = f"base/{chip.name}", chip.base_image
    if "@sha256:" in reference:
        return {key: reference.rsplit("@", 1)[1]}
    if settings.offline:
        return {key: f"unresolved:{reference}"}
    repository, tag = split_reference(reference)
    try:
        digest = RegistryClient(Repository.parse(repository), timeout_s=settings.hub_timeout_s).manifest_digest(tag)
    except FlagReleaseError:
        digest = None
    return {key: digest or f"unresolved:{reference}"}


def split_reference(reference: str) -> tuple[str, str]:
    """`host[:port]/path:tag` -> (`host[:port]/path`, tag); no tag means `latest`."""
    slash = reference.rfind("/")
    repository, colon, tag = reference[slash + 1:].partition(":")
    return reference[:slash + 1] + repository, tag if colon else "latest"


def fingerprint(inputs: dict[str, str]) -> str:
    return _digest(inputs)


def _pyproject(project_dir: Path) -> dict:
    with (project_dir / "pyproject.toml").open("rb") as handle:
        return tomllib.load(handle)


def _pins(requirements: list[str]) -> dict[str, str]:
    pins = {}
    for requirement in requirements:
        name, _, version = requirement.partition("==")
        pins[name.strip().lower()] = version.strip()
    return pins


def image_requirements(project_dir: Path) -> dict[str, str]:
    """The `==` pins of pyproject's image extras and of what installs beside them without its dependencies: the
    kernel toolchain and the serving engine in every image built from our wheelhouse."""
    project = _pyproject(project_dir)
    extras = project["project"]["optional-dependencies"]
    pins = {}
    for extra in IMAGE_EXTRAS:
        pins.update(_pins(extras[extra]))
    rules = engine_install_rules(project_dir)
    pins.update(_pins(rules.no_deps + rules.built_here))
    return dict(sorted(pins.items()))


@dataclass(frozen=True)
class EngineInstallRules:
    """pyproject's [tool.flagrelease]: what installs without its dependencies, what is never installed, and what
    the package index has only as source (built into wheels here)."""

    no_deps: list[str]
    excluded: list[str]
    built_here: list[str]


def engine_install_rules(project_dir: Path) -> EngineInstallRules:
    rules = _pyproject(project_dir)["tool"]["flagrelease"]
    return EngineInstallRules(list(rules["engine-no-deps"]), list(rules["engine-excluded"]),
                              list(rules["engine-built-here"]))


def write_plan(plan: Plan, release_dir: Path) -> Path:
    """<release dir>/plan.json, written atomically; the same fingerprint overwrites with the same inputs."""
    return write_model(release_dir / "plan.json", plan)


def read_plan(path: Path) -> Plan:
    return Plan.model_validate_json(path.read_text(encoding="utf-8"))


def _digest(value: object) -> str:
    canonical = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()
