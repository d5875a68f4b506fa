"""Publish a release that passed its gate: attach the card, the evaluation report, the kernels manifest and the
release record to the image digest as OCI artifacts, then the hub cards, then move `latest` last.

Distribution 2.8 has no referrers API, so the artifacts are found through the OCI 1.1 fallback: an OCI index
under the tag `sha256-<hex of the image digest>` listing them. We talk to the distribution API directly
(flows.registry) rather than through oras-py, which neither writes that index nor reports errors promptly, or
skopeo, which refuses artifacts. Order matters: nothing a user follows (`latest`, a hub card) changes until every
artifact is stored; a re-run after any failure finds what is stored and completes the rest; publishing a
fingerprint that is already published changes nothing.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from datetime import datetime

from pydantic import BaseModel, ConfigDict

from flows.build.image import ImageRef
from flows.errors import FlagReleaseError
from flows.registry import RegistryClient

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
EMPTY_CONFIG = "application/vnd.oci.empty.v1+json"
TITLE = "org.opencontainers.image.title"
MOVING_TAG = "latest"


class PublishRefused(FlagReleaseError):
    pass


class Attachment(BaseModel):
    model_config = ConfigDict(frozen=True)

    artifact_type: str
    filename: str
    media_type: str
    data: bytes


ARTIFACT_TYPES = {
    "card": ("application/vnd.flagrelease.card.v1+markdown", "README.md", "text/markdown"),
    "evaluation": ("application/vnd.flagrelease.evaluation.v1+json", "evaluation.json", "application/json"),
    "kernels": ("application/vnd.flagrelease.kernels.v1+json", "kernels.json", "application/json"),
    "record": ("application/vnd.flagrelease.record.v1+json", "release.json", "application/json"),
    "results": ("application/vnd.flagrelease.results.v1+json", "results.json", "application/json"),
}


def attachment(kind: str, data: bytes) -> Attachment:
    artifact_type, filename, media_type = ARTIFACT_TYPES[kind]
    return Attachment(artifact_type=artifact_type, filename=filename, media_type=media_type, data=data)


class HubResult(BaseModel):
    model_config = ConfigDict(frozen=True)

    hub: str
    repo: str
    published: bool
    detail: str


class ReleaseRecord(BaseModel):
    """What was published, by digest: the release's receipt and the next release's changelog baseline."""

    model_config = ConfigDict(frozen=True)

    release: str
    fingerprint: str
    repository: str
    image_digest: str
    version_tag: str
    moving_tag: str
    model: str
    model_revision: str
    weights: dict[str, str]  # file -> sha256
    verdict: str
    scores: dict[str, dict[str, float]]  # benchmark -> native / flagos / drop
    versions: dict[str, str]
    inputs: dict[str, str]
    card_sha256: str
    published_at: datetime


def referrers_tag(digest: str) -> str:
    return digest.replace(":", "-")


def referrers(registry: RegistryClient, digest: str) -> list[dict]:
    """The artifacts attached to `digest`, from the fallback index (empty when there is none)."""
    if registry.manifest_digest(referrers_tag(digest)) is None:
        return []
    body, _, _ = registry.manifest(referrers_tag(digest))
    return json.loads(body).get("manifests", [])


def attached_record(registry: RegistryClient, digest: str) -> ReleaseRecord | None:
    """The release record attached to an image digest, if it was published (or half-published) before."""
    artifact_type = ARTIFACT_TYPES["record"][0]
    for descriptor in referrers(registry, digest):
        if descriptor.get("artifactType") == artifact_type:
            body, _, _ = registry.manifest(descriptor["digest"])
            layer = json.loads(body)["layers"][0]
            return ReleaseRecord.model_validate_json(registry.blob(layer["digest"]))
    return None


def previous_record(registry: RegistryClient, digest: str) -> ReleaseRecord | None:
    """The record of the release `latest` points at now, when that is another image."""
    current = registry.manifest_digest(MOVING_TAG)
    return attached_record(registry, current) if current and current != digest else None


def attach(registry: RegistryClient, image_digest: str, attachments: list[Attachment]) -> list[dict]:
    """Push each attachment as an OCI artifact whose subject is the image, and list it in the fallback index."""
    body, media_type, _ = registry.manifest(image_digest)
    subject = {"mediaType": media_type, "digest": image_digest, "size": len(body)}
    config = registry.push_blob(b"{}", EMPTY_CONFIG)
    descriptors = []
    for item in attachments:
        layer = {**registry.push_blob(item.data, item.media_type), "annotations": {TITLE: item.filename}}
        manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": item.artifact_type,
                    "config": config, "layers": [layer], "subject": subject, "annotations": {TITLE: item.filename}}
        encoded = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
        digest = registry.put_manifest("sha256:" + hashlib.sha256(encoded).hexdigest(), encoded, OCI_MANIFEST)
        descriptors.append({"mediaType": OCI_MANIFEST, "digest": digest, "size": len(encoded),
                            "artifactType": item.artifact_type, "annotations": {TITLE: item.filename}})
    existing = referrers(registry, image_digest)
    known = {d["digest"] for d in existing}
    merged = existing + [d for d in descriptors if d["digest"] not in known]
    if len(merged) != len(existing):
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": merged}
        registry.put_manifest(referrers_tag(image_digest), json.dumps(index, sort_keys=True).encode(), OCI_INDEX)
    return descriptors


def move_tag(registry: RegistryClient, tag: str, image_digest: str) -> bool:
    """Point `tag` at the image (the manifest's exact bytes under a new name); False when it already does."""
    if registry.manifest_digest(tag) == image_digest:
        return False
    body, media_type, _ = registry.manifest(image_digest)
    stored = registry.put_manifest(tag, body, media_type)
    if stored != image_digest:
        raise PublishRefused(f"the registry stored {tag} as {stored}, not {image_digest}")
    return True


def publish_release(registry: RegistryClient, image: ImageRef, make_record: Callable[[], ReleaseRecord],
                    attachments: list[Attachment], publish_hubs: Callable[[], list[HubResult]],
                    log: Callable[[str], None]) -> tuple[ReleaseRecord, list[HubResult], bool]:
    """Attach, publish the hub cards, move `latest`; returns (record, hub results, whether anything changed).
    The record already attached to this digest is reused, so a re-run completes a half-published release."""
    if registry.manifest_digest(image.digest) is None:
        raise PublishRefused(f"{image.by_digest} is not in the registry; the build stage must push it first")
    record = attached_record(registry, image.digest)
    if record is not None and registry.manifest_digest(MOVING_TAG) == image.digest:
        log(f"{image.by_digest} is already published ({MOVING_TAG} points at it): nothing to do")
        return record, [], False
    if record is None:
        record = make_record()
        data = record.model_dump_json(indent=2).encode()
        descriptors = attach(registry, image.digest, [*attachments, attachment("record", data)])
        for descriptor in descriptors:
            log(f"attached {descriptor['annotations'][TITLE]} as {descriptor['digest']}")
    else:
        log("found the release record attached by an earlier run; completing the publication")
        attach(registry, image.digest, attachments)
    hubs = publish_hubs()
    move_tag(registry, MOVING_TAG, image.digest)
    log(f"{image.repository}:{MOVING_TAG} -> {image.digest}")
    return record, hubs, True
