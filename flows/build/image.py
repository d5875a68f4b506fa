"""Build a release image with the Docker Engine and push it by digest; skip both when the registry already holds
the plan's fingerprint.

The SDK's low-level build and push report failures only inside their streams, so every chunk is checked: an
`error` chunk becomes BuildFailed naming the Dockerfile step that failed, a push error becomes PushFailed.
Naming: `<registry>/<namespace>/<model>-<chip>:<fingerprint[:12]>`. That version tag is immutable (same tag, same
inputs), so one HEAD request tells whether a release is already built; moving tags are the publish stage's job.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import docker
from pydantic import BaseModel, ConfigDict

from flows.build.base import BaseImageUnavailable, ensure_base_image
from flows.build.context import BuildContext, assemble_context
from flows.build.wheels import image_wheelhouse
from flows.errors import FlagReleaseError
from flows.kernel_artifacts import KernelArtifacts
from flows.plan import Plan
from flows.registry import RegistryClient

STEP = re.compile(r"^Step (\d+/\d+) : (.*)$")


STEP_TAIL = 5  # output lines of a failed step quoted in the error


class BuildFailed(FlagReleaseError):
    def __init__(self, step: str, error: str, output: list[str] | None = None):
        self.step = step
        tail = "; its last output: " + " | ".join(output) if output else ""
        super().__init__(f"image build failed at {step}: {error.strip()}{tail}")


class PushFailed(FlagReleaseError):
    pass


class ImageUnavailable(FlagReleaseError):
    pass


class ImageRef(BaseModel):
    """The release image as the registry holds it."""

    model_config = ConfigDict(frozen=True)

    repository: str
    version: str
    digest: str
    built: bool
    pushed: bool

    @property
    def by_digest(self) -> str:
        return f"{self.repository}@{self.digest}"

    @property
    def by_tag(self) -> str:
        return f"{self.repository}:{self.version}"


def image_wheels(plan: Plan, project_dir: Path, log: Callable[[str], None]) -> list[Path]:
    """The wheels an image installs: our wheelhouse on a base made here; none on a chip vendor's base, which
    carries its own vLLM, FlagScale and FlagGems."""
    return image_wheelhouse(project_dir, log) if plan.chip.base_debootstrap is not None else []


def existing_image(plan: Plan, registry: RegistryClient) -> ImageRef | None:
    """The release image if the registry already holds this fingerprint's version tag (one HEAD request)."""
    digest = registry.manifest_digest(plan.short_fingerprint)
    if digest is None:
        return None
    return ImageRef(repository=plan.repository, version=plan.short_fingerprint, digest=digest, built=False, pushed=False)


def build_release_image(plan: Plan, kernels: KernelArtifacts, client: docker.DockerClient, registry: RegistryClient,
                        context_dir: Path, project_dir: Path, auth: dict[str, str] | None,
                        log: Callable[[str], None], no_cache: bool = False) -> ImageRef:
    repository = plan.repository
    version = plan.short_fingerprint
    existing = existing_image(plan, registry)
    if existing is not None:
        log(f"{repository}:{version} already in the registry ({existing.digest}): nothing changed, no build, no push")
        return existing
    debootstrap = plan.chip.base_debootstrap
    base = ensure_base_image(client, plan.chip.name, debootstrap, log) if debootstrap else plan.chip.base_image
    context = assemble_context(plan, kernels, base, image_wheels(plan, project_dir, log), context_dir, project_dir)
    log(f"build context for {repository}:{version} rendered in {context.path}")
    if not debootstrap:
        require_base_image(client, plan.chip.name, base, context.path)
    tag = f"{repository}:{version}"
    image_id = build(client, context, tag, log, no_cache)
    digest = push(client, repository, version, auth, log)
    served = registry.manifest_digest(digest)
    if served != digest or registry.manifest_digest(version) != digest:
        raise PushFailed(f"the registry does not serve {tag} as {digest} after the push (it serves {served})")
    log(f"pushed {tag} = {repository}@{digest} (image {image_id[:19]})")
    return ImageRef(repository=repository, version=version, digest=digest, built=True, pushed=True)


def require_base_image(client: docker.DockerClient, chip: str, reference: str, context: Path) -> None:
    """The chip's base image must be in the engine or pullable; otherwise this host cannot build the chip."""
    try:
        client.images.get(reference)
        return
    except docker.errors.ImageNotFound:
        pass
    try:
        client.images.pull(reference)
    except docker.errors.APIError as exc:
        raise BaseImageUnavailable(
            f"chip {chip}: base image {reference} is not in this engine and cannot be pulled "
            f"({exc.explanation or exc}). This chip builds on a host that reaches its registry (the chip's work pool); "
            f"the rendered build context is in {context}") from None


def build(client: docker.DockerClient, context: BuildContext, tag: str, log: Callable[[str], None],
          no_cache: bool = False) -> str:
    """Stream the build log line by line; turn an error chunk into BuildFailed naming the step and its last output."""
    step, image_id, output = "the start of the build", None, []
    try:
        for chunk in client.api.build(path=str(context.path), tag=tag, labels=context.labels, rm=True, forcerm=True,
                                      decode=True, pull=False, nocache=no_cache):
            if "error" in chunk:
                raise BuildFailed(step, chunk.get("errorDetail", {}).get("message") or chunk["error"],
                                  output[-STEP_TAIL:])
            for line in chunk.get("stream", "").splitlines():
                if line.strip():
                    log(line.rstrip())
                    match = STEP.match(line.strip())
                    if match:
                        step, output = f"step {match.group(1)} ({match.group(2)[:120]})", []
                    elif not line.startswith(" ---> "):
                        output.append(line.strip())
            image_id = chunk.get("aux", {}).get("ID", image_id)
    except docker.errors.APIError as exc:  # the engine refused the request itself, e.g. its disk filled with the context
        raise BuildFailed(step, f"the Docker Engine answered {exc.status_code}: {exc.explanation or exc}") from None
    if image_id is None:
        raise BuildFailed(step, "the engine reported no image id")
    return image_id


def push(client: docker.DockerClient, repository: str, version: str, auth: dict[str, str] | None,
         log: Callable[[str], None]) -> str:
    digest = None
    for chunk in client.images.push(repository, tag=version, stream=True, decode=True, auth_config=auth):
        if "error" in chunk:
            raise PushFailed(f"push of {repository}:{version} failed: {chunk['error']}")
        if chunk.get("status") in ("Pushed", "Layer already exists"):
            log(f"{chunk['status']} {chunk.get('id', '')}")
        digest = chunk.get("aux", {}).get("Digest", digest)
    if digest is None:
        raise PushFailed(f"push of {repository}:{version} ended without a digest")
    return digest


def ensure_local_image(client: docker.DockerClient, image: ImageRef, auth: dict[str, str] | None,
                       log: Callable[[str], None]) -> None:
    """The engine must hold the image by digest to run it; pull it when this machine did not build it."""
    try:
        client.images.get(image.by_digest)
        return
    except docker.errors.ImageNotFound:
        pass
    log(f"pulling {image.by_digest}")
    try:
        client.images.pull(image.repository, tag=image.digest, auth_config=auth)
    except docker.errors.APIError as exc:
        raise ImageUnavailable(f"cannot pull {image.by_digest} to evaluate it: {exc.explanation or exc}") from None
