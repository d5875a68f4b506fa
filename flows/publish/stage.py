"""The publish stage as plain code: render the card from what the earlier stages recorded, then publish it with the
report, the kernels manifest and the release record (flows.publish.release)."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from flows.build.image import ImageRef
from flows.evaluate.stage import EvaluationReport
from flows.files import sha256_file, write_atomic, write_model
from flows.matrix import NATIVE_REFERENCE, ReleaseMatrix
from flows.plan import Plan
from flows.publish.card import card_data, card_title, changelog, render_card
from flows.publish.hubs import publish_cards
from flows.publish.release import (HubResult, PublishRefused, ReleaseRecord, attachment, previous_record,
                                   publish_release)
from flows.publish.results import PublishedResults, results_attachment
from flows.registry import RegistryClient
from flows.weights.manifest import WeightsManifest


def publish(plan: Plan, matrix: ReleaseMatrix, image: ImageRef, weights: WeightsManifest, report: EvaluationReport,
            registry: RegistryClient, release_dir: Path, project_dir: Path, hub_org: str,
            log: Callable[[str], None], native: PublishedResults | None = None
            ) -> tuple[ReleaseRecord, list[HubResult], Path, bool]:
    """Publish a release whose evaluation passed, with its native per-item results when it ran a native stack (for
    releases that compare with it from another host); returns the record, the hub results, the card's path and
    whether anything changed (False: this fingerprint was already published)."""
    if not report.passed:
        raise PublishRefused(f"{plan.release} did not pass its evaluation ({report.failure_reason()}); not publishing")
    if report.fingerprint != plan.fingerprint:
        raise PublishRefused(f"the evaluation report is for fingerprint {report.fingerprint[:12]}, the release is "
                             f"{plan.fingerprint[:12]}; evaluate this fingerprint first")
    config = registry.image_config(image.digest)
    labels = config.get("config", {}).get("Labels") or {}
    versions = {k.removeprefix("flagrelease.tool."): v for k, v in labels.items() if k.startswith("flagrelease.tool.")}
    reference_chip = plan.chip if plan.reference == NATIVE_REFERENCE else matrix.chips[matrix.release(plan.reference).chip]
    lines = changelog(previous_record(registry, image.digest), plan, report, versions)
    card = render_card(card_data(plan, image, config, report, weights, reference_chip.vendor, lines),
                       project_dir / "templates")
    card_path = write_atomic(release_dir / "README.md", card)
    attachments = [attachment("card", card.encode()), attachment("evaluation", report.model_dump_json(indent=2).encode())]
    if native is not None and native.sets:
        attachments.append(results_attachment(native))
        log(f"attaching {len(native.sets)} native result sets ({sum(len(s.results) for s in native.sets):,} answers)")
    kernels = release_dir / "kernels.json"
    if kernels.exists():
        attachments.append(attachment("kernels", kernels.read_bytes()))
    else:
        log("kernels.json is not on this machine (the image was built elsewhere): the kernels manifest stays in the "
            "image only")

    def record() -> ReleaseRecord:
        return ReleaseRecord(
            release=plan.release, fingerprint=plan.fingerprint, repository=image.repository,
            image_digest=image.digest, version_tag=image.version, moving_tag="latest", model=plan.model_name,
            model_revision=weights.revision, weights={f.path: f.sha256 for f in weights.files},
            verdict=report.verdict.value,
            scores={o.benchmark: {"native": o.gate.native_accuracy, "flagos": o.gate.flagos_accuracy, "drop": o.gate.drop}
                    for o in report.outcomes if o.gate},
            versions=versions, inputs=plan.inputs, card_sha256=sha256_file(card_path),
            published_at=datetime.now(timezone.utc))

    published, hubs, changed = publish_release(
        registry, image, record, attachments,
        lambda: publish_cards(hub_org, card_title(plan), card, plan.fingerprint), log)
    write_model(release_dir / "release.json", published)
    if changed:
        write_atomic(release_dir / "hubs.json", json.dumps([h.model_dump() for h in hubs], indent=2) + "\n")
    return published, hubs, card_path, changed
